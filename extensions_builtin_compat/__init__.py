"""The webui side of DreamArtist: the only package that imports the webui's `modules` (and Forge's packages).

Feature probes live in ``host``; the Backend over the loaded model in ``host_backend``; the embeddings folder
and database in ``embeddings``; training under the webui's job state in ``jobs``; the automatic negative
partner in ``prompt_hook``; the tab, settings and HTTP API in ``ui_tab``, ``settings`` and ``api``.
"""
