"""A plan's compute on a slice you rent (`doa plan --target v5e-8`): chip-hours, the slice's wall
time, and dollars on demand and on spot.

The target is a row of `doa_jax/bench/targets.toml` (as `doa aot` names them: v4-8, v5e-8, v5p-8,
v6e-8, h100, h100x8, ...); its accelerator's rate card (`rate_cards.toml`) gives the price per chip-hour,
with its source and date. The plan's cost profile runs on that accelerator: `mfu` (analytic FLOPs at
an ASSUMED utilisation of its peak, the default) or `calibrated` (examples per second measured by
`doa calibrate` on it). The profile's dollars are chip-seconds times the on-demand price, so an arm's
chip-hours are its compute dollars over that price; the slice's wall time is chip-hours over its
chips (every phase runs on the whole slice, each chip at the profile's rate); spot dollars are the
same chip-hours at the card's spot price. Where a card has no published price (every spot price
today, or an accelerator without a card), the user gives one (`--usd-per-chip-hour`,
`--spot-usd-per-chip-hour`) and the output names it as theirs; nothing is guessed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from doa_jax import hardware
from doa_jax.bench import targets
from doa_jax.experiment import costs
from doa_jax.experiment.cost_profiles import CostProfile, load_profile

# Profiles that price work on the slice's own accelerator (the paper's prices A100s only).
SLICE_PROFILES = ("mfu", "calibrated")
NO_SPOT = ("no published spot price of {key} is in the rate cards (none could be read where they were written: "
           "no network): give one with --spot-usd-per-chip-hour")


@dataclasses.dataclass(frozen=True)
class SlicePrice:
    """What one chip-hour of the target costs, and what the time is based on."""

    target: str
    chips: int
    accelerator: str
    usd_per_chip_hour: float
    price_source: str
    spot_usd_per_chip_hour: Optional[float]
    spot_price_source: str        # where the spot price comes from, or why there is none
    time_source: str              # the cost profile's source (an ASSUMED MFU says so)
    assumed: bool

    def arm(self, compute_usd: float) -> dict[str, Any]:
        """An arm's compute (its on-demand dollars under the slice's profile) on the slice."""
        chip_hours = compute_usd / self.usd_per_chip_hour
        spot = None if self.spot_usd_per_chip_hour is None else chip_hours * self.spot_usd_per_chip_hour
        return {"chip_hours": chip_hours, "wall_hours": chip_hours / self.chips,
                "on_demand_usd": chip_hours * self.usd_per_chip_hour, "spot_usd": spot,
                "price_source": self.price_source}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def slice_cards(target: targets.Target, *, rate_cards: Optional[str] = None, usd_per_chip_hour: Optional[float] = None,
                spot_usd_per_chip_hour: Optional[float] = None) -> dict[str, costs.Accelerator]:
    """The rate cards with the target's accelerator priced: its card, with the user's prices over it
    (a card it lacks is made from hardware.toml's peak and the user's price, which is then required)."""
    cards = dict(costs.load_rate_cards(rate_cards))
    key = target.hardware_key
    for flag, value in (("--usd-per-chip-hour", usd_per_chip_hour), ("--spot-usd-per-chip-hour", spot_usd_per_chip_hour)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be a positive number of dollars, got {value}")
    card = cards.get(key)
    if card is None:
        if usd_per_chip_hour is None:
            raise ValueError(f"no rate card prices {key} (target {target.name}) in "
                             f"{rate_cards or costs.RATE_CARDS}: no published price could be read here; give one "
                             f"with --usd-per-chip-hour")
        hw = hardware.get(key)
        card = costs.Accelerator(key, hw.name, usd_per_chip_hour, hw.peak_flops, "given with --usd-per-chip-hour", "")
    elif usd_per_chip_hour is not None:
        card = dataclasses.replace(card, usd_per_chip_hour=usd_per_chip_hour, date="",
                                   source=f"given with --usd-per-chip-hour (the card's: ${card.usd_per_chip_hour:g}, "
                                          f"{card.source}, {card.date})")
    if spot_usd_per_chip_hour is not None:
        card = dataclasses.replace(card, spot_usd_per_chip_hour=spot_usd_per_chip_hour,
                                   spot_source="given with --spot-usd-per-chip-hour")
    cards[key] = card
    return cards


def slice_profile(target_name: str, *, cost_profile: Optional[str] = None, calibration: Optional[str] = None,
                  mfu: Optional[float] = None, rate_cards: Optional[str] = None,
                  usd_per_chip_hour: Optional[float] = None,
                  spot_usd_per_chip_hour: Optional[float] = None) -> tuple[CostProfile, SlicePrice]:
    """The cost profile a plan on `target_name` prices with, and the slice's prices."""
    target = targets.get(target_name)
    name = cost_profile or ("calibrated" if calibration is not None else "mfu")
    if name not in SLICE_PROFILES:
        raise ValueError(f"--target prices compute on the slice's own chips: use --cost-profile mfu (an ASSUMED "
                         f"MFU, the default) or calibrated (--calibration measured on {target.hardware_key}), "
                         f"not {name!r}")
    cards = slice_cards(target, rate_cards=rate_cards, usd_per_chip_hour=usd_per_chip_hour,
                        spot_usd_per_chip_hour=spot_usd_per_chip_hour)
    profile = load_profile(name, accelerator=target.hardware_key, calibration=calibration, mfu=mfu, cards=cards)
    return profile, price_of(target, profile.accelerator, profile)


def price_of(target: targets.Target, card: costs.Accelerator, profile: CostProfile) -> SlicePrice:
    time_source = profile.source
    cal: Mapping[str, Any] = getattr(profile, "calibration", {})
    if cal and cal.get("device_count") != target.chips:
        time_source += (f"; measured on {cal['device_count']} devices, scaled linearly to the {target.chips} "
                        f"chips of {target.name}")
    where = f"${card.usd_per_chip_hour:g}/chip-hour: {card.source}" + (f" ({card.date})" if card.date else "")
    spot_where = (f"${card.spot_usd_per_chip_hour:g}/chip-hour: {card.spot_source}" if card.spot_usd_per_chip_hour
                  else NO_SPOT.format(key=card.key))
    return SlicePrice(target.name, target.chips, card.key, card.usd_per_chip_hour, where, card.spot_usd_per_chip_hour,
                      spot_where, time_source, profile.assumed)
