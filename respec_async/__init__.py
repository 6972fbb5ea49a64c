"""respec-async: asynchronous actor-model RL training of language models with speculative decoding.

Implements ReSpec (arXiv 2510.26475): an adaptive speculative-decoding server, an online
drafter learner and reward-weighted distillation, as independent processes (generator,
reward, trainer, drafter-learner) started and watched by one supervisor (`respec launch`).
"""

__version__ = "0.1.0"
