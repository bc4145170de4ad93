"""Evaluation: decoding a split and scoring it (the metric registry), and the HTML report."""
