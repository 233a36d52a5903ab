"""The trainer: a plain library (torch, transformers, peft), never Django.

It runs in its own Python environment (see pyproject's `train` dependency group); the platform
talks to it through command-line entry points that print JSON.
"""
