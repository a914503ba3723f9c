"""Self-supervised and semi-supervised robust training: ACL pre-training, fine-tuning, pseudo-labels.

``dat-ds pretrain`` trains an encoder + projection head with the ``acl`` objective on the usual
trainer; ``dat-ds finetune --mode slf|alf|aff`` evaluates it on labels; ``dat-ds pseudo-label`` runs a
teacher over an unlabeled pool for RST-style training (``data.unlabeled``).
"""

from .augment import simclr_augment, two_views
from .model import ContrastiveModel, LinearProbe, build_contrastive_model
from .losses import nt_xent, nt_xent_to_target

__all__ = ["ContrastiveModel", "LinearProbe", "build_contrastive_model", "nt_xent", "nt_xent_to_target",
           "simclr_augment", "two_views"]
