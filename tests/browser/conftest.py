# Helper files of tests/test_browser.py. The fixture notebook here is executed by that test in a
# real JupyterLab; keep nbval (`--nbval-lax` in addopts) from also collecting it as a notebook test.
collect_ignore_glob = ["*.ipynb"]
