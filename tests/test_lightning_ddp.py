"""Lightning's ShiftCallback under DDP on 2 CPU processes (gloo): every rank switches at the same step."""

import pytest
import torch

L = pytest.importorskip("lightning")

from loopscape.integrations.lightning import ShiftCallback  # noqa: E402
from loopscape.looped.decoder import get_n_loops  # noqa: E402
from loopscape.models.linear_attn import looped_attn  # noqa: E402


class Toy(L.LightningModule):
    """Looped-Attn on random 3-token rows; the ranks' validation losses differ, so SCP alone
    would decide differently on each."""

    def __init__(self, out: str):
        super().__init__()
        self.model, self.out, self.loops_seen = looped_attn(n_loops=1, max_len=3), out, []

    def training_step(self, batch, i):
        self.loops_seen.append(get_n_loops(self))
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def validation_step(self, batch, i):
        x, y = batch
        # rank 1's loss falls by 0.6 every validation: alone, SCP would never see a plateau there
        drift = self.global_rank * (20.0 - 0.3 * self.global_step)
        self.log("val_loss", torch.nn.functional.cross_entropy(self.model(x), y) + drift)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        torch.save(self.loops_seen, f"{self.out}/rank{self.global_rank}.pt")


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randint(0, 3, (n, 3), generator=g), torch.randint(0, 3, (n,), generator=g)
    )


def test_lightning_ranks_switch_together(tmp_path):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=30,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[ShiftCallback(n_loops=3, scp={"patience": 2, "min_delta": 0.05, "wait": 1, "max_wait": 1})],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        Toy(str(tmp_path)),
        torch.utils.data.DataLoader(rows(256, 0), batch_size=8),
        torch.utils.data.DataLoader(rows(64, 1), batch_size=32),
    )
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert len(rank0) == 30 and rank0 == rank1
    assert rank0[0] == 1 and rank0[-1] == 3  # the switch came, at the same step on both ranks
