"""The training application: ``python -m spngd_ext.train`` / ``spngd-train``.

Built on the library's public surface (:class:`spngd_ext.SPNGD`); the library never imports this
package. It needs the ``train`` extra (tqdm, matplotlib) for progress bars and plots.

Modules: :mod:`.cli` (flags, training loop, comparisons), :mod:`.baselines` (SGD, LARS, AdamW,
ASDL K-FAC, SP-NGD built one way), :mod:`.data` (Fashion-MNIST), :mod:`.models`, :mod:`.augment`,
:mod:`.schedules` (LR warm-up and decay), :mod:`.run_log`, :mod:`.reporting`, :mod:`.env`
(torchrun set-up).
"""

from .cli import (
    RunResult,
    TrainConfig,
    build_parser,
    config_from_args,
    evaluate,
    main,
    parse_compare,
    run_compare,
    run_training,
)

__all__ = [
    "RunResult",
    "TrainConfig",
    "build_parser",
    "config_from_args",
    "evaluate",
    "main",
    "parse_compare",
    "run_compare",
    "run_training",
]
