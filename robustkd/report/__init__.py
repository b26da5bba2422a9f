"""Reports: every distilled student against its teacher, with a verdict, as HTML, Markdown and JSON.

``robustkd.report(runs, out, ...)`` is :func:`make_report`. The numbers come from the functions behind
``robustkd evaluate``, ``robustkd certify`` and the faithfulness evaluation, cached per settings in each
run dir; see docs/report.md for how to read the report.
"""

from robustkd.report.build import make_report
from robustkd.report.settings import ReportSettings, Thresholds
from robustkd.report.verdict import CHECKS, check_values, verdict

__all__ = ["CHECKS", "ReportSettings", "Thresholds", "check_values", "make_report", "verdict"]

from robustkd._callable import make_module_callable

make_module_callable(__name__, "make_report")
