"""Small Qt helpers shared by the docks (no engine, no layers)."""

from __future__ import annotations

from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import QAbstractButton, QDoubleSpinBox, QSpinBox

__all__ = ["optional_spin", "optional_value", "threads_spin", "with_shortcut"]


def optional_spin(minimum: float, maximum: float, default: float | None, step: float, none_text: str,
                  tooltip: str) -> QDoubleSpinBox:
    """A float spin box whose lowest position means "unset" (shown as ``none_text``): the
    engine then picks its own default. ``default`` None starts there."""
    spin = QDoubleSpinBox(minimum=minimum - step, maximum=maximum, singleStep=step, decimals=2)
    spin.setSpecialValueText(none_text)
    spin.setValue(spin.minimum() if default is None else default)
    spin.setToolTip(tooltip)
    return spin


def optional_value(spin: QDoubleSpinBox) -> float | None:
    """The spin box's value, or None at its "unset" position."""
    return None if spin.value() <= spin.minimum() else float(spin.value())


def threads_spin(cores: int) -> QSpinBox:
    """CPU threads for the engine; 0 (shown as "auto") = the engine's policy, ``cores`` (the
    cores this process may use)."""
    spin = QSpinBox(minimum=0, maximum=max(64, cores))
    spin.setSpecialValueText(f"auto ({cores})")
    spin.setToolTip("CPU threads the engine computes with (auto: the cores this process may use). "
                    "On a machine other programs keep busy, 1 can be as fast and leaves them their cores. "
                    "Results can differ in the last float digits between thread counts.")
    return spin


def with_shortcut(button: QAbstractButton, keys: str) -> None:
    """Give ``button`` the keyboard shortcut ``keys`` (e.g. "Alt+R"; active anywhere in the
    napari window while the dock is shown) and name it in the button's tooltip. Alt and
    Ctrl combinations only: napari binds the plain keys to layer modes; and not Alt with
    F, V, L, P, D, W or H, which open napari's menus, nor napari's own Ctrl keys (a
    clash makes Qt drop both)."""
    button.setShortcut(QKeySequence(keys))
    tip = button.toolTip()
    button.setToolTip(f"{tip} ({keys})" if tip else keys)
