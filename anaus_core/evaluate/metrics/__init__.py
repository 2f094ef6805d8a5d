"""Evaluation metrics, one per module (``overlap``, ``hausdorff``, ``classification``,
``bootstrap``, ``paired_test``), each a pure function held by a test against an independent
reference. Nothing is imported here so that classification runs do not load MONAI."""
