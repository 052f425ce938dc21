"""Offline copies of lm-eval tasks: YAML templates mirroring lm-eval's own, plus the loaders they name.

`qkvconv.evaluate.resolve_tasks` turns each template into a real task YAML (the absolute data file
paths appended as `dataset_kwargs`) when `--data-dir` holds that task's files. Everything except
where the data comes from (`custom_dataset`, `dataset_kwargs`) and the `tag` line is lm-eval's own
config, so metrics, prompts and task versions are identical; `tests/test_evaluate.py` checks that.
"""
