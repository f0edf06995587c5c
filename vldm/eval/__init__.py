"""Evaluation on the shapes dataset: the oracle that judges generated clips, and its aggregates."""
from vldm.eval.metrics import markdown_table, summarize
from vldm.eval.oracle import Judgement, judge, judge_all, parse_prompt, score, temporal_consistency
