"""How a trained model is run: the inference plan and every rule that reads it.

Everything that decides or applies how a network turns raw slices into a mask lives in
this package; the planner (:mod:`mitoseg.planner`), evaluation, volume jobs, the
service, the napari plugin and the bioimage.io export only call it.

=========================================  ===============================================
module                                     owns
=========================================  ===============================================
:mod:`mitoseg.inference.plan`              the plan schema (:class:`InferencePlan`,
                                           ``inference_plan.json``), the one default plan
                                           of a network (:meth:`InferencePlan.default_for`),
                                           which class is mitochondria
                                           (:func:`~mitoseg.inference.plan.foreground_class`),
                                           2.5D context windows
:mod:`mitoseg.inference.normalize`         intensity normalisation (training patches and
                                           inference alike), blank slices
:mod:`mitoseg.inference.predict`           tiling and blending, TTA, 2.5D context and
                                           z-averaging of a stack, ``decide_mask``
                                           (threshold, hysteresis, argmax)
:mod:`mitoseg.inference.runtime`           engines: Keras, OpenVINO FP32 / BF16 / INT8
:mod:`mitoseg.inference.objects`           instances: 3D connected components, object
                                           measurements, instance metrics
=========================================  ===============================================

Import the modules themselves (``from mitoseg.inference.predict import segment_stack``):
this file re-exports nothing. Pure numpy / scipy / pydantic at import time: no
TensorFlow, OpenVINO, MLflow or BentoML import.
"""
