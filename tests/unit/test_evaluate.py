"""`mlmjob evaluate` and the perplexity before the first step, end to end on the tiny runs
of test_train (its fixtures and helpers: a preprocessed dataset, an uninterrupted
reference run). The direct tests: no process, no server (the others are in
tests/integration/test_evaluate.py)."""

import pytest

from job.train.evaluate import result_name


@pytest.mark.unit
def test_result_names_are_distinct_and_plain():
    assert result_name("distilbert/distilroberta-base") == "distilbert--distilroberta-base"
    assert result_name("s3://bucket/runs/a/model/") == "bucket--runs--a--model"
    assert result_name("out/a b/model") == "out--a_b--model"
    assert result_name("runs/a/model") != result_name("runs/b/model")
