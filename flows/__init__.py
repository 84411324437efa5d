"""Prefect flows: `train-model` (one attempt of a training operation) and `resume-training`.

Flows orchestrate tasks and hold no tensor code.
"""
