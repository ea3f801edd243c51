mod replica;
mod sim;
mod storage;
