# SPDX-License-Identifier: MIT
"""StepGraph: one step's attend calls (every layer, and whatever else the
callback enqueues) captured in a CUDA graph with torch, and replayed for later
steps of the same shape (RESA_STEP_REPLAY; docs/integration.md section 9).

    g = resa.graphs.StepGraph(ctx)          # ctx on the CUDA backend
    with ctx.step(seqs, resa.Mode.DECODE, 1) as step:
        g.capture(lambda: run_all_layers(step))     # captured, then run once
    with ctx.step(seqs2, resa.Mode.DECODE, 1, replay=True):
        g.replay()

A graph reuses the captured buffers: write each step's inputs into the same
q/k/v tensors and read the same out tensors.  The context runs every later
step on the graph's side stream (capture needs a stream other than the
default one, and a replay must run on the stream its step was begun on);
each eager attend and each replay is ordered after torch's current stream
and before its later work, so mixing eager steps and replays needs no
synchronization by the caller.
"""
from ._enums import Backend
from ._errors import BadStateError, NotSupportedError

__all__ = ["StepGraph"]


class StepGraph:
    def __init__(self, ctx):
        try:
            import torch
        except ImportError:
            raise NotSupportedError("StepGraph: needs torch (pip install torch)") from None
        if ctx.backend != Backend.CUDA:
            raise NotSupportedError("StepGraph: needs a context on the CUDA backend, got %s"
                                    % ctx.backend.name)
        self._torch = torch
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.stream = torch.cuda.Stream(device=self.device)
        self.graph = torch.cuda.CUDAGraph()
        self.captured = False
        ctx._use_side_stream(self.stream)

    def _open_step(self, replay):
        st = self.ctx._step
        self.ctx._handle()
        if st is None or st.replay != replay:
            raise BadStateError("%s: needs an open step begun with replay=%s"
                                % ("replay" if replay else "capture", replay))
        if st.side is not self.stream:
            raise BadStateError("%s: the open step was not begun on this StepGraph's stream "
                                "(begin it after creating the StepGraph)"
                                % ("replay" if replay else "capture"))

    def _launch(self):
        torch = self._torch
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.graph.replay()
        current.wait_stream(self.stream)

    def capture(self, fn, pool=None):
        """Captures everything fn enqueues (call step.attend for every layer
        in it) on the side stream, then runs the graph once for the open
        step, since capturing runs nothing.  Returns fn's result."""
        torch = self._torch
        self._open_step(replay=False)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.graph(self.graph, pool=pool, stream=self.stream):
            result = fn()
        self._launch()
        self.captured = True
        return result

    def replay(self):
        """Runs the captured graph for the open step begun with replay=True."""
        if not self.captured:
            raise BadStateError("replay: nothing was captured yet")
        self._open_step(replay=True)
        self._launch()
