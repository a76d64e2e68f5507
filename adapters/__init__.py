"""Host formats: RELION STAR, cryoSPARC .cs, MRC stacks and maps, atomic models, RELION jobs.

Installed as ``deephemnma_bridge.adapters`` (never as a top-level ``adapters``).
"""
