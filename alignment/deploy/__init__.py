"""Deployment: post-hoc language maps carried by an export, ONNX and int8 exports, embedding quantisation.

* :mod:`alignment.deploy.maps` -- per-language centring / Procrustes maps fitted on a calibration split
  (``align fit-map``), saved, applied at eval time and carried by a sentence-transformers export as a
  ``Router`` module selected with ``encode(texts, task=LANGUAGE)``.
* :mod:`alignment.deploy.onnx_export` -- ``align export --format onnx``: ``onnx/model.onnx`` (+ int8
  dynamic quantisation) in the folder layout sentence-transformers' ONNX backend reads.
* :mod:`alignment.deploy.variants` -- ``align eval --variants``: quality, size and speed of each variant.
"""
