"""Whole-slide images through the exported model: tissue, tiles, heatmaps, slide scores (``pcamtool slide``).

Needs the ``slides`` extra (``pip install 'pcamtool[slides]'``: OpenSlide);
nothing here imports it until a slide is opened.
"""
from .run import SlideOptions, SlideSummary, run_slides

__all__ = ["SlideOptions", "SlideSummary", "run_slides"]
