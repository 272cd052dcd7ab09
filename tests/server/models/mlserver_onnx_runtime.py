"""An MLServer custom runtime that serves an ONNX file with onnxruntime (runs in MLServer's venv).

MLServer imports this module from the model folder it is copied into; it never runs in
interscope's environment, whose pins MLServer's would clash with.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    """One ONNX graph: the request's first input in, the declared output out, FP32."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        # The test machine is small and shared; one thread keeps MLServer from starving others.
        options.intra_op_num_threads = 1
        self._session = ort.InferenceSession(
            uri, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._output = self._settings.outputs[0].name if self._settings.outputs else "logits"
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        (out,) = self._session.run([self._output], {self._input: x})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(self._output, np.asarray(out, dtype=np.float32))],
        )
