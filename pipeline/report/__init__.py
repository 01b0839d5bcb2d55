"""The run report: `submissions/<run>/report.html` with its plots, and a side-by-side of two runs.

`plots` draws (arrays in, PNG bytes out), `html` assembles the self-contained page, `build` reads a
run folder and the artifacts it used and puts the two together.
"""

from pipeline.report.build import (
    ABLATION_FILE, PLOTS_DIR, REPORT_FILE, ROBUSTNESS_FILE, TRUTH_FILE, ReportConfig, RunData, build_report,
    compare_runs, load_run, write_report_safely,
)

__all__ = [
    "ABLATION_FILE", "PLOTS_DIR", "REPORT_FILE", "ROBUSTNESS_FILE", "TRUTH_FILE", "ReportConfig", "RunData",
    "build_report", "compare_runs", "load_run", "write_report_safely",
]
