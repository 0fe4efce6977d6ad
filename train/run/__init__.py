"""The training run's machinery: which experiment it is (`identity`), its directory and record (`directory`,
`records`), where it resumes (`resume`), one writer (`lock`), graceful stops (`preemption`), bad steps
(`guard`), the lr of a step (`schedule`), the layout accelerate sets (`layout`), the phase a hang happened in
(`phases`), ranks agreeing on a branch (`ranks`), and fault injection for the tests (`faults`)."""
