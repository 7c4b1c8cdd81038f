"""The benchmark behind `kontext bench`: contestants, interleaved timing, quality vs the reference, reports.

It lives in the package (not in benchmarks/) because `kontext bench` is a console script of the installed
distribution, whose wheel ships only `engine`; benchmarks/ keeps measured results and thin scripts.
"""

from .report import ResultFiles, format_table, result_records, run_record, write_results
from .run import BenchConfig, BenchRun
from .runner import default_buckets, run_bench

__all__ = [
    "BenchConfig",
    "BenchRun",
    "ResultFiles",
    "default_buckets",
    "format_table",
    "result_records",
    "run_bench",
    "run_record",
    "write_results",
]
