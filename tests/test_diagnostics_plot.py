"""The one diagnostics picture (util/diagnostics_plot.py) that diagnose.py and summarize.py draw."""
import matplotlib
import pytest

from util.diagnostics_plot import Panel, Series, draw_diagnostics, plot_diagnostics

matplotlib.use("Agg")


def _close(fig):
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_a_series_keeps_its_colour_in_every_panel_and_the_shared_legend_lists_all():
    """A variant missing from one panel (no AP yet) neither shifts the others' colours nor drops out of
    the legend above the grid."""
    only_diag = Panel("AP (%)", x=[1, 2], series=[Series("v3.0.4", [10.0, 20.0], colour=0)])
    both = Panel("D4/fg_in_img", x=[0, 1, 2], series=[Series("v3.0.4", [0.2, 0.3, 0.4], colour=0),
                                                       Series("cascade", [0.5], x=[0], colour=1)])
    fig = draw_diagnostics([only_diag, both], legend_title="variant",
                           format_x=lambda x: "init" if x == 0 else f"{x:g}")
    first, second = fig.axes[0].get_lines(), fig.axes[1].get_lines()
    assert first[0].get_color() == second[0].get_color() != second[1].get_color()
    assert list(second[1].get_xdata()) == [0]  # a series at its own epochs
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["v3.0.4", "cascade"]
    assert "init" in [tick.get_text() for tick in fig.axes[1].get_xticklabels()]
    _close(fig)


def test_one_x_position_is_bars_with_their_values_and_the_band_as_error_bars():
    panel = Panel("D3/jaccard", x=[0], ticks=["dec1"], series=[Series("epoch 1", [0.25], band=([0.2], [0.4])),
                                                               Series("epoch 2", [float("nan")])])
    fig = draw_diagnostics([panel], title="t")
    ax = fig.axes[0]
    assert [round(bar.get_height(), 6) for bar in ax.patches] == [0.25, 0.0]
    assert [text.get_text() for text in ax.texts] == ["0.25", "n/a"]
    (error_bars,) = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    (segments,) = error_bars.lines[2][0].get_segments()
    assert [round(y, 6) for _, y in segments] == [0.2, 0.4]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["dec1"]
    _close(fig)


def test_a_pooled_mean_is_black_and_each_panel_has_its_legend_without_a_shared_one(tmp_path):
    panel = Panel("D5/entropy", x=[0, 1], ticks=["enc0", "enc1"],
                  series=[Series("lvl0", [0.9, 0.8]), Series("mean", [0.85, 0.8], emphasised=True)])
    fig = draw_diagnostics([panel, panel])
    assert fig.axes[0].get_lines()[1].get_color() == "black" and not fig.legends
    assert all(ax.get_legend() is not None for ax in fig.axes[:2])
    _close(fig)
    plot_diagnostics([panel], str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not both"):
        draw_diagnostics([panel], title="t", legend_title="l")
