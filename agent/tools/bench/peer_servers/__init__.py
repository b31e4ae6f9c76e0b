"""Adapters that serve the agent's own Predictor inside other model servers (KServe, PyTriton, MLServer).

Each module runs with a peer's virtualenv (`scripts/bench-peers` builds them) and this source tree on PYTHONPATH;
they import only the transport-neutral part of the agent (agent.core, agent.runtime) plus the peer itself.
"""
