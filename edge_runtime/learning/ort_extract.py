"""Feature extraction through onnxruntime, for devices that have it installed.

Per batch of 64 at 32x32 it ran ~2.4x faster than the folded channels-last PyTorch path,
but the model must be exported again after every round's training (TorchScript exporter:
~0.1-0.5 s; the dynamo exporter took ~8 s), so it pays off for shards of more than a few
batches (docs/performance.md). onnxruntime is not a base dependency of a device.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from edge_runtime.protocol.messages import FeatureBatch


def ort_session(model: nn.Module, example: torch.Tensor):
    """An onnxruntime session of the eval-mode ``model`` -> (logits, H), dynamic batch."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise RuntimeError("extraction backend 'onnxruntime' needs onnxruntime installed "
                           "(pip install onnxruntime)") from err
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True, which takes
        # ~50x longer here: too slow to repeat every round.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["x"],
                          output_names=["logits", "h"], dynamic_axes={"x": {0: "n"}})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def ort_extract_features(model: nn.Module, loader: Iterable) -> Iterator[FeatureBatch]:
    """Same batches as ``train.extract_features``, computed by onnxruntime."""
    session = None
    for x, y, ids in loader:
        x = x.float().contiguous()
        if session is None:
            with torch.no_grad():
                session = ort_session(model, x)
        logits, h = session.run(None, {"x": x.numpy()})
        yield FeatureBatch(ids.long(), torch.from_numpy(h), torch.from_numpy(logits), y.long())
