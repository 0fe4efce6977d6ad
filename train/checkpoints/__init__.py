"""Checkpoints and trained models: DCP save and load (`checkpoint`), reading DCP metadata without running code
(`dcp_metadata`), a trained model from a run, checkpoint or export (`sources`), `model.init_from` (`init_from`)."""
