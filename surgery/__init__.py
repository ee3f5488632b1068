"""surgery: streaming weight surgery for LLM checkpoints.

    import surgery
    surgery.upcycle("path/to/mistral", "out/mixtral", rules="mistral-to-mixtral",
                    num_experts=4, experts_per_token=2)
"""

__version__ = "0.2.0"

from .api import assemble, plan, upcycle  # noqa: E402
from .checkpoint import open_checkpoint  # noqa: E402
from .errors import SurgeryError  # noqa: E402
from .plan import Options  # noqa: E402
from .rules import load_rules  # noqa: E402

__all__ = ["Options", "SurgeryError", "assemble", "load_rules", "open_checkpoint", "plan", "upcycle"]
