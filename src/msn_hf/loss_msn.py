"""The MSN objective: prototype assignments, sharpened Sinkhorn targets, cross-entropy and mean-entropy maximisation."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _global_count(count: int, device: torch.device) -> torch.Tensor:
    """`count` summed over all processes, as a float32 tensor of shape `()` on `device`."""
    # Filled on the device: `torch.tensor(count, device=...)` would copy from the host and wait for the stream.
    return _all_reduce_sum_(torch.full((), float(count), device=device))


class _AllReduceSum(torch.autograd.Function):
    """
    Sum over processes in the forward. In the backward, each process gets the gradient of the sum times the number
    of processes: DDP averages the processes' gradients, which brings it back to the gradient of the global sum.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.world_size = _world_size()
        if ctx.world_size == 1:
            return tensor
        return _all_reduce_sum_(tensor.clone())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output * ctx.world_size


@torch.no_grad()
def sinkhorn_knopp(
    probs: torch.Tensor, num_iterations: int = 3, global_batch_size: torch.Tensor | None = None
) -> torch.Tensor:
    r"""
    Sinkhorn-Knopp balancing of assignment probabilities, distributed over all processes.

    With Q = probs.T ([K, B_global]) divided by its global sum, each iteration scales every prototype row to sum
    1/K, then every sample column to sum 1/B_global; the result is multiplied by B_global so that each sample's
    assignment sums to 1 and each prototype receives an equal share of the global batch. B_global is the real
    number of rows of all processes, which may differ (a process that skipped unreadable images has fewer).

    Args:
        probs (`torch.FloatTensor` of shape `(batch_size, num_prototypes)`): non-negative, this process's rows.
        num_iterations (`int`): number of row/column scaling rounds.
        global_batch_size (`torch.Tensor` of shape `()`, *optional*): B_global, when the caller has summed it
            already; otherwise it is summed over the processes here.

    Returns:
        `torch.FloatTensor` of shape `(batch_size, num_prototypes)`.
    """
    q = probs.t().clone()
    num_prototypes = q.shape[0]
    global_batch = _global_count(q.shape[1], q.device) if global_batch_size is None else global_batch_size
    # A prototype no sample reaches (all its entries underflowed to 0) would divide 0 by 0: it keeps its zeros.
    tiny = torch.finfo(q.dtype).tiny
    q /= _all_reduce_sum_(q.sum())
    for _ in range(num_iterations):
        q /= _all_reduce_sum_(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= global_batch
    q *= global_batch
    return q.t()


@dataclass
class MSNLossOutput:
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): total objective.
        prediction_loss (`torch.FloatTensor` of shape `()`): cross-entropy between targets and anchor assignments
            (this process's share: see [`MSNLoss`]).
        me_max_loss (`torch.FloatTensor` of shape `()`): KL divergence of the mean anchor assignment from the prior
            (mean-entropy maximisation for the uniform prior; 0 when usage matches the prior).
        entropy_loss (`torch.FloatTensor` of shape `()`): mean entropy of the anchor assignments (this process's
            share).
        anchor_probs (`torch.FloatTensor` of shape `(num_anchor_views * batch_size, num_prototypes)`).
        target_probs (`torch.FloatTensor` of shape `(batch_size, num_prototypes)`): sharpened, balanced targets.
    """

    loss: torch.Tensor
    prediction_loss: torch.Tensor
    me_max_loss: torch.Tensor
    entropy_loss: torch.Tensor
    anchor_probs: torch.Tensor
    target_probs: torch.Tensor


class MSNLoss(nn.Module):
    r"""
    The MSN objective, computed in float32 whatever the autocast state.

    For an embedding z and prototypes P (K rows), with temperature tau and label smoothing s:

        p(z) = (1 - s) * softmax( <z / |z|, P / |P|> / tau ) + s / K

    Anchor rows a_1..a_N ([random views; focal views], each block of batch_size rows) get p_i = p(a_i). Targets
    (no gradient) are sharpened with temperature T and balanced by Sinkhorn-Knopp:

        t = SinkhornKnopp( p(z_target)^(1/T) / sum_k p(z_target)_k^(1/T) ),

    then repeated once per anchor view. With p_bar the mean of all anchor rows of all processes and q a prior
    over the K prototypes:

        prediction_loss = mean_i  -sum_k t_ik log p_ik
        me_max_loss     = KL(p_bar || q) = sum_k p_bar_k log p_bar_k - sum_k p_bar_(k) log q_k
        entropy_loss    = mean_i  -sum_k p_ik log p_ik
        loss            = prediction_loss + me_max_weight * me_max_loss + entropy_weight * entropy_loss

    `target_prior="uniform"` (MSN's mean-entropy maximisation): q_k = 1/K, so me_max_loss = sum_k p_bar_k log
    p_bar_k + log K. `"power_law"` (PMSN, Assran et al., ICLR 2023): q_k = k^(-tau) / sum_j j^(-tau) for ranks
    k = 1..K, and p_bar_(k) is the k-th largest entry of p_bar: prototypes are interchangeable, so the prior is
    matched to them by rank (the relabelling with the smallest KL, by the rearrangement inequality); tau = 0 is
    the uniform case.

    All logarithms are taken from log-softmax values, so no exponential of a large logit is ever formed.

    Over several processes, which may hold different numbers of rows (a process that skipped unreadable images has
    fewer), every mean is over the global batch: Sinkhorn and p_bar use the real global count, and each process's
    `prediction_loss` and `entropy_loss` are its own mean times `world_size * batch_size / global_batch_size`, so
    that their mean over the processes (what DDP does to the gradients) is the mean over the global batch.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        target_sharpen_temperature: float = 0.25,
        sinkhorn_iterations: int = 3,
        me_max_weight: float = 1.0,
        entropy_weight: float = 0.0,
        label_smoothing: float = 0.0,
        target_prior: str = "uniform",
        power_law_exponent: float = 0.25,
    ):
        super().__init__()
        if target_prior not in ("uniform", "power_law"):
            raise ValueError(f"`target_prior` must be 'uniform' or 'power_law', got {target_prior!r}.")
        self.target_prior = target_prior
        self.power_law_exponent = power_law_exponent
        self.temperature = temperature
        self.target_sharpen_temperature = target_sharpen_temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.me_max_weight = me_max_weight
        self.entropy_weight = entropy_weight
        self.label_smoothing = label_smoothing

    def log_prior(self, num_prototypes: int, device: torch.device | None = None) -> torch.Tensor:
        """`log q_k` for ranks k = 1..K, shape `(num_prototypes,)`: uniform, or the normalised power law k^(-tau)."""
        if self.target_prior == "uniform":
            return torch.full((num_prototypes,), -math.log(num_prototypes), device=device)
        log_unnormalised = -self.power_law_exponent * torch.arange(1, num_prototypes + 1, device=device).float().log()
        return log_unnormalised - torch.logsumexp(log_unnormalised, dim=0)

    def log_probs(self, embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Log prototype assignments `log p(z)`, shape `(num_rows, num_prototypes)`."""
        logits = F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).t() / self.temperature
        log_probs = F.log_softmax(logits, dim=-1)
        if self.label_smoothing > 0:
            num_prototypes = prototypes.shape[0]
            log_probs = torch.logaddexp(
                log_probs + math.log1p(-self.label_smoothing),
                torch.full_like(log_probs, math.log(self.label_smoothing / num_prototypes)),
            )
        return log_probs

    @torch.no_grad()
    def targets(
        self,
        target_embeddings: torch.Tensor,
        prototypes: torch.Tensor,
        global_batch_size: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Sharpened, Sinkhorn-balanced target assignments, shape `(batch_size, num_prototypes)`; `global_batch_size`
        (the rows of all processes) as in [`sinkhorn_knopp`].
        """
        sharpened = F.softmax(self.log_probs(target_embeddings, prototypes) / self.target_sharpen_temperature, dim=-1)
        if self.sinkhorn_iterations > 0:
            sharpened = sinkhorn_knopp(sharpened, self.sinkhorn_iterations, global_batch_size)
        return sharpened

    def forward(
        self, anchor_embeddings: torch.Tensor, target_embeddings: torch.Tensor, prototypes: torch.Tensor
    ) -> MSNLossOutput:
        """
        Args:
            anchor_embeddings (`torch.Tensor` of shape `(num_anchor_views * batch_size, dim)`): view-major rows.
            target_embeddings (`torch.Tensor` of shape `(batch_size, dim)`).
            prototypes (`torch.Tensor` of shape `(num_prototypes, dim)`): unnormalised.
        """
        batch_size = target_embeddings.shape[0]
        if anchor_embeddings.shape[0] % batch_size != 0:
            raise ValueError(
                f"`anchor_embeddings` must have a multiple of batch_size={batch_size} rows, got {anchor_embeddings.shape[0]}."
            )
        with torch.autocast(device_type=anchor_embeddings.device.type, enabled=False):
            # Processes may hold different numbers of rows (unreadable images are skipped): every mean over the
            # global batch divides by the real count, summed over the processes.
            global_batch_size = _global_count(batch_size, anchor_embeddings.device)
            # A per-row mean of this process, times this share, averages over processes (as DDP averages the
            # gradients) to the mean over the global batch; 1 when every process holds as many rows.
            share = _world_size() * batch_size / global_batch_size
            prototypes = prototypes.float()
            anchor_log_probs = self.log_probs(anchor_embeddings.float(), prototypes)
            target_probs = self.targets(target_embeddings.float().detach(), prototypes.detach(), global_batch_size)
            num_views = anchor_embeddings.shape[0] // batch_size
            # Row v * batch_size + i has target i: broadcasting over the views instead of a repeated copy.
            per_view_log_probs = anchor_log_probs.view(num_views, batch_size, -1)
            prediction_loss = -(target_probs * per_view_log_probs).sum(dim=-1).mean() * share
            anchor_probs = anchor_log_probs.exp()
            mean_probs = _AllReduceSum.apply(anchor_probs.sum(dim=0)) / (num_views * global_batch_size)
            # Clamped so that an unused prototype contributes 0 * finite rather than 0 * -inf.
            log_mean_probs = mean_probs.clamp_min(torch.finfo(mean_probs.dtype).tiny).log()
            me_max_loss = (mean_probs * log_mean_probs).sum()
            if self.target_prior == "uniform":
                me_max_loss = me_max_loss + math.log(prototypes.shape[0])
            else:
                ranked = mean_probs.sort(descending=True).values
                me_max_loss = me_max_loss - (ranked * self.log_prior(prototypes.shape[0], ranked.device)).sum()
            entropy_loss = -(anchor_probs * anchor_log_probs).sum(dim=-1).mean() * share
            loss = prediction_loss + self.me_max_weight * me_max_loss + self.entropy_weight * entropy_loss
        return MSNLossOutput(
            loss=loss,
            prediction_loss=prediction_loss,
            me_max_loss=me_max_loss,
            entropy_loss=entropy_loss,
            anchor_probs=anchor_probs,
            target_probs=target_probs,
        )
