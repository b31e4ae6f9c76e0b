"""An MLServer runtime serving the agent's Predictor (`implementation` of each model-settings.json that
agent.tools.bench.peers writes; settings.json binds 127.0.0.1 and sets `parallel_workers: 0`, because
MLServer 1.7.1's default worker pool crashes with uvloop >= 0.22: SeldonIO/MLServer#2286)."""

from __future__ import annotations

from typing import Any

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from agent.tools.bench.peer_servers.common import infer, load_predictors


class PredictorRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        self._predictor: Any = load_predictors(only=self.name)[self.name]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        frame = NumpyCodec.decode_input(payload.inputs[0])
        outputs = [NumpyCodec.encode_output(name, array) for name, array in infer(self._predictor, frame).items()]
        return InferenceResponse(model_name=self.name, id=payload.id, outputs=outputs)
