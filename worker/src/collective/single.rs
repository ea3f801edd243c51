//! The gang of one: what `train_value` uses, so the single-process path and the data-parallel one are the
//! same code.

use tch::Tensor;

use super::{Collective, check_blocks};
use crate::error::{Error, Result};

#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    /// The sum over one rank is the tensor itself.
    fn all_reduce_sum(&mut self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }

    fn broadcast(&mut self, _t: &mut Tensor, root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::Collective(format!("broadcast from rank {root} in a gang of 1 (only rank 0 exists)")));
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }

    /// The one rank's block is the whole output.
    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_blocks("all_gather in a gang of 1", 1, input, output)?;
        tch::no_grad(|| output.copy_(&input.reshape(output.size())));
        Ok(())
    }

    /// The sum over one rank, all of it this rank's block.
    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_blocks("reduce_scatter_sum in a gang of 1", 1, output, input)?;
        tch::no_grad(|| output.copy_(&input.reshape(output.size())));
        Ok(())
    }
}
