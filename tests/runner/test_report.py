"""The local report's comparison with a reference."""

from consensusfit.runner.local.report import fit_report


def test_a_constant_component_is_reported_without_an_error_in_reference_sds():
    """A correlated block's Cholesky factor has fixed entries (1 and 0): their reference SD is 0."""
    stats = {"rhat": 1.0, "ess_bulk": 900.0}
    summary = {"parameters": {
        "L[0,0]": {"mean": 1.0, "sd": 0.0, "q05": 1.0, "q95": 1.0},
        "mu": {"mean": 0.1, "sd": 1.0, "q05": -1.5, "q95": 1.7},
    }}
    diagnostics = [{"parameters": {"L[0,0]": stats, "mu": stats}}]
    reference = {"L[0,0]": {"mean": 1.0, "sd": 0.0}, "mu": {"mean": 0.0, "sd": 2.0}}
    text = fit_report(summary, diagnostics, reference)
    [constant] = [line for line in text.splitlines() if line.startswith("L[0,0]")]
    assert constant.split()[-2:] == ["-", "-"]
    [mu] = [line for line in text.splitlines() if line.startswith("mu")]
    assert mu.split()[-2:] == ["+0.05", "0.50"]
