"""Exports of trained models to formats other tools load (BioImage Model Zoo packages).

Importing this package imports nothing heavy; :mod:`mitoseg.export.bioimageio` imports
``bioimageio.spec`` and Keras inside its functions.
"""
