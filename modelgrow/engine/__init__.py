"""The training engine shared by the fit pass (modelgrow.fit) and `modelgrow train`
(modelgrow.trainer): one loop, one learning-rate schedule family, one way to place
work on devices and processes, one step-state format for resuming."""
