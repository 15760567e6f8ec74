"""instructjax: InstructGPT (Ouyang et al. 2022) in JAX/Flax — SFT, reward model, PPO-ptx.

Kept free of heavy imports so ``import instructjax`` is fast; import submodules explicitly
(``from instructjax import model, sharding``).
"""

__version__ = "0.1.0"
