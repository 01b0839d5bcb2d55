"""Adversarial robustness: L-inf attacks, adversarial training losses, the robustness evaluation."""
