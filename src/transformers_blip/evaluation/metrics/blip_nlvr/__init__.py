"""A local `evaluate` module: `evaluate.load(metric_path("nlvr"))`."""
