"""The fault and fuzz suite: hostile numbers, a hostile machine, a stalled or vanished store.

Every test here reproduces a defect found by trying the library as an attacker or an unlucky
operator would, and failed before its fix. Tests that need root (``setpriv``, ``unshare``, a small
tmpfs mount) or a tool ask for it through :func:`tests.faults._needs.require_root` or
:func:`tests.faults._needs.require_tool`: they skip with the reason elsewhere, and fail instead
when ``AIOLIMITS_REQUIRE_ROOT=1``, which ``.ci/run`` sets (CI runs as root).
"""
