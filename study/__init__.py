"""Driver side of the study: configuration, stages, Ray Tune, MLflow, reports.

search_spaces/*.yaml -> ``study`` (validate, run stages) -> ``trainables`` (one trial on a worker).
"""
