"""Which orderings of results rows hold under both classifiers (results.fd_orderings)."""

import pytest

from dydit_lab.evaluation.results import describe_orderings, fd_orderings


def row(name, fd, fd_alt, spread=None, accuracy=None, accuracy_alt=None):
    """A hand-made results row as read from the CSV (strings), with intervals fd +- spread."""
    r = {"name": name, "fd_lenet": str(fd), "fd_lenet_alt": "" if fd_alt is None else str(fd_alt)}
    if spread is not None:
        r |= {"fd_lenet_lo": str(fd - spread), "fd_lenet_hi": str(fd + spread),
              "fd_lenet_alt_lo": str(fd_alt - spread), "fd_lenet_alt_hi": str(fd_alt + spread)}
    if accuracy is not None:
        r |= {"accuracy": str(accuracy), "accuracy_alt": str(accuracy_alt)}
    return r


ROWS = [row("lab-S", 18.8, 15.0, 1.0), row("lab-L", 21.3, 14.0, 1.0), row("lambda 0.5", 30.0, 26.0, 1.0),
        row("old row", 25.0, None)]


def test_orderings_that_hold_and_flip():
    orderings = {(o["better"], o["worse"]): o for o in fd_orderings(ROWS)}
    # "old row" has no second score: left out unless named
    assert set(orderings) == {("lab-S", "lab-L"), ("lab-S", "lambda 0.5"), ("lab-L", "lambda 0.5")}
    flip = orderings["lab-S", "lab-L"]
    assert not flip["holds"] and flip["gap"] == pytest.approx(2.5) and flip["gap_alt"] == pytest.approx(-1.0)
    assert flip["separated"] is False
    held = orderings["lab-L", "lambda 0.5"]
    assert held["holds"] and held["gap_alt"] == pytest.approx(12.0) and held["separated"] is True


def test_better_row_comes_first_whatever_the_order_given():
    (o,) = fd_orderings(ROWS, names=["lambda 0.5", "lab-S"])
    assert (o["better"], o["worse"]) == ("lab-S", "lambda 0.5") and o["holds"]


def test_overlapping_intervals_are_not_separated_and_missing_ones_are_unknown():
    rows = [row("a", 10.0, 10.0, 3.0), row("b", 12.0, 13.0, 3.0), row("c", 20.0, 21.0)]
    orderings = {(o["better"], o["worse"]): o for o in fd_orderings(rows)}
    assert orderings["a", "b"]["holds"] and orderings["a", "b"]["separated"] is False
    assert orderings["a", "c"]["separated"] is None


def test_accuracy_orders_higher_first():
    rows = [row("a", 1, 1, accuracy=0.80, accuracy_alt=0.90), row("b", 1, 1, accuracy=0.85, accuracy_alt=0.88)]
    (o,) = fd_orderings(rows, metric="accuracy", higher_is_better=True)
    assert (o["better"], o["worse"]) == ("b", "a") and not o["holds"]
    assert o["gap"] == pytest.approx(0.05) and o["gap_alt"] == pytest.approx(-0.02)


def test_unknown_or_unscored_rows_are_named():
    with pytest.raises(ValueError, match=r"rows not found \['nope'\]"):
        fd_orderings(ROWS, names=["lab-S", "nope"])
    with pytest.raises(ValueError, match=r"^rows without fd_lenet and fd_lenet_alt \['old row'\].*rescore"):
        fd_orderings(ROWS, names=["lab-S", "old row"])


def test_description_says_which_hold():
    lines = describe_orderings(fd_orderings(ROWS)).splitlines()
    assert lines[0].startswith("FLIPS: lab-S better than lab-L on FD-LeNet by 2.5 (second classifier: -1)")
    assert lines[2] == ("holds: lab-L better than lambda 0.5 on FD-LeNet by 8.7 (second classifier: +12); "
                        "intervals disjoint under both")
    assert describe_orderings([]) == ""
