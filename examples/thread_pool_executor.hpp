// A minimal engine-side thread pool that runs sparse_attn's work items: implement
// sparse_attn::Executor (concurrency() and run()) and pass it in the options. Workers are started
// once and reused by every call; run() hands items out through one atomic counter and the calling
// thread works too, so concurrency() = pool threads + 1.
#pragma once
#include <sparse_attn/exec/executor.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

class ThreadPoolExecutor final : public sparse_attn::Executor {
 public:
  explicit ThreadPoolExecutor(int threads) {
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w] { work(w); });
  }
  ~ThreadPoolExecutor() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int concurrency() const noexcept override { return static_cast<int>(workers_.size()) + 1; }

  void run(sparse_attn::index_t n, sparse_attn::ItemFunction body) override {
    std::unique_lock<std::mutex> lock(mutex_);
    body_ = &body;
    n_ = n;
    next_.store(0);
    busy_ = static_cast<int>(workers_.size());
    ++generation_;
    lock.unlock();
    wake_.notify_all();
    drain(0);  // the calling thread is worker 0
    lock.lock();
    done_.wait(lock, [this] { return busy_ == 0; });
    body_ = nullptr;
  }

 private:
  void drain(int worker) {
    for (sparse_attn::index_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*body_)(i, worker);
  }
  void work(int worker) {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      lock.unlock();
      drain(worker);
      lock.lock();
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  std::uint64_t generation_ = 0;
  int busy_ = 0;
  const sparse_attn::ItemFunction* body_ = nullptr;
  sparse_attn::index_t n_ = 0;
  std::atomic<sparse_attn::index_t> next_{0};
};
