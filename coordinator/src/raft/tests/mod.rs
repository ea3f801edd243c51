mod sim;
mod storage;
