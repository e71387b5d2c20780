"""Tools that ship with shmbus's source, not with the installed package.

The benchmark against the bus's peers (:mod:`.bench`), the soak
(:mod:`.soak`), the demo (:mod:`.demo`), the per-event cost profile
(:mod:`.profile`), and what they and the tests share: the child-process
harness (:mod:`.children`) and the servers some of them need
(:mod:`.servers`).
Run them through ``./tools/bench``, ``./tools/soak``, ``./tools/demo`` and
``./tools/profile``, which put this directory on ``PYTHONPATH``.
"""
