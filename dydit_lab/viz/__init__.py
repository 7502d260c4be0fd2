"""Pictures: plot functions (headless, each returns its Figure), the figure builders shared by
the notebooks and ``make figures``, and the ipywidgets router explorer."""
