"""Evaluation: judge agreement, ranking metrics (ir_measures), RAG metrics, reports. No Ray imports."""
