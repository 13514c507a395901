//! The one place between the backward pass and the optimizer step: where data-parallel training
//! averages the gradients across processes. A single process leaves them as they are.

use crate::error::Result;
use tch::Tensor;

/// Acts on the parameters' gradients after each backward pass, before the optimizer step.
pub trait GradientSync {
    fn synchronize(&mut self, params: &[Tensor]) -> Result<()>;
}

/// One process: the gradients are already the batch's.
pub struct Local;

impl GradientSync for Local {
    fn synchronize(&mut self, _params: &[Tensor]) -> Result<()> {
        Ok(())
    }
}
