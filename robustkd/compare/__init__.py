"""Comparisons: methods × seeds under one frozen protocol, with intervals, paired tests and claim verdicts.

``robustkd.compare(config)`` is :func:`compare`; ``robustkd compare --config FILE`` runs it from the command
line. See docs/compare.md.
"""

from robustkd.compare.claims import judge, load_claims, parse_claim
from robustkd.compare.config import CompareConfig, load_compare_config
from robustkd.compare.run import collect_claims, compare

__all__ = ["CompareConfig", "collect_claims", "compare", "judge", "load_claims", "load_compare_config", "parse_claim"]

from robustkd._callable import make_module_callable

make_module_callable(__name__, "compare")
