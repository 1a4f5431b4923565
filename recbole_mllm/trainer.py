"""Trainers of the plugin's models. ``utils.get_trainer`` finds ``<Model>Trainer`` here first."""
