"""Plot colours: one per optimizer across every panel of a study."""

from __future__ import annotations

from spngd_ext.train.reporting import optimizer_colours


def test_one_colour_per_optimizer_across_panels() -> None:
    panels = [
        ("batch 1024", [("lars (lr 0.2)", []), ("sgd (lr 0.1)", []), ("spngd (lr 0.01)", [])]),
        ("batch 4096", [("asdl-kfac (lr 0.03)", []), ("spngd (lr 0.005)", []), ("sgd (lr 0.2)", [])]),
    ]
    colours = optimizer_colours(panels, ["c0", "c1", "c2"])
    assert colours == {"lars": "c0", "sgd": "c1", "spngd": "c2", "asdl-kfac": "c0"}  # palette wraps
