"""The Spine worker: ``python worker.py`` (or ``spine worker``).

Everything a worker needs comes from :class:`spine.SpinePlugin`; settings come from the
environment (``SPINE_AGENTS``, ``SPINE_POLICY``, ``SPINE_TASK_QUEUE``, ``VAULT_ADDR``, ...). See
``spine/worker.py`` for what ``main`` wires, and the README's "Your own worker" for the few lines
that build one in your own project.
"""

from spine.worker import main

if __name__ == "__main__":
    main()
