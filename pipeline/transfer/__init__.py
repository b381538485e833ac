"""Transfer a pretrained ViT to downstream benchmarks: fine-tuning and few-shot runs, fanned out on Ray and
recorded in MLflow (``jobs/transfer.py`` runs it; its configuration is ``pipeline.config.transfer``).

The package owns, in the order a sweep uses them:

- ``tasks``: the downstream benchmark registry (names, aliases such as ``vtab``, recipes, VTAB score);
- ``source``: the pretrained model (an MLflow run, an export directory or an official ``.npz``) and building it;
- ``sweep``: ``plan_sweep``, every check before any Ray work, and the ``SweepPlan`` of runs;
- ``finetune`` and ``fewshot``: one run each, plain functions that run in-process as well as in a Ray task;
- ``summary``: the learning rate chosen on minival and the parent run's rows (schema: ``pipeline.results``);
- ``orchestrate``: ``run_sweep``, the MLflow parent / child runs and the Ray fan-out, and ``describe_plan``.

Nothing is imported here: ``pipeline.config.transfer`` imports ``tasks``, so importing the submodules from this
file would make a cycle.
"""
