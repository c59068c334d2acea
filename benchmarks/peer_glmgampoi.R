# glmGamPoi's Gamma-Poisson GLM on the cells peer_glmgampoi.py hands over (see its docstring).
#
# Usage: Rscript peer_glmgampoi.R <folder> <n_cells> <n_features> <n_groups>
# Reads from <folder> (raw little-endian, written by peer_glmgampoi.py):
#   counts.i32  int32 [n_cells, n_features] in C order, i.e. column-major features x cells
#   size_factors.f64  float64 [n_cells]
#   groups.i32  int32 [n_cells], group codes 0..n_groups-1, 0 = baseline
# Writes to <folder>:
#   beta.f64  float64 [n_features, n_groups] column-major: fit$Beta, natural log
#   se.f64  float64 [n_features, n_groups - 1] column-major: Wald SEs of the non-baseline
#     group coefficients, natural log
#   overdispersion.f64  float64 [n_features]: fit$overdispersions
#   meta.tsv  key<TAB>value: fit seconds, coefficient names, versions, VmHWM
# Exit status 3: glmGamPoi is not installed.

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 4L) stop("usage: peer_glmgampoi.R <folder> <n_cells> <n_features> <n_groups>")
if (!requireNamespace("glmGamPoi", quietly = TRUE)) {
  message("glmGamPoi is not installed")
  quit(save = "no", status = 3L)
}
folder <- args[[1L]]
n_cells <- as.integer(args[[2L]])
n_features <- as.integer(args[[3L]])
n_groups <- as.integer(args[[4L]])
path <- function(name) file.path(folder, name)

read_raw <- function(name, what, size, n) {
  con <- file(path(name), "rb")
  on.exit(close(con))
  x <- readBin(con, what = what, n = n, size = size, endian = "little")
  if (length(x) != n) stop(sprintf("%s: %d values, expected %d", name, length(x), n))
  x
}
write_raw <- function(x, name) {
  con <- file(path(name), "wb")
  on.exit(close(con))
  writeBin(as.double(x), con, size = 8L, endian = "little")
}

counts <- matrix(
  read_raw("counts.i32", "integer", 4L, n_cells * n_features),
  nrow = n_features, ncol = n_cells
)
storage.mode(counts) <- "double" # what glm_gp works on; converted before the clock starts
size_factors <- read_raw("size_factors.f64", "double", 8L, n_cells)
groups <- read_raw("groups.i32", "integer", 4L, n_cells)
labels <- sprintf("LINE%03d", seq_len(n_groups) - 1L)
col_data <- data.frame(cell_line = factor(labels[groups + 1L], levels = labels))
indicator <- outer(groups, seq_len(n_groups) - 1L, "==") + 0 # [cells, groups] 0/1

start <- proc.time()[["elapsed"]]
fit <- glmGamPoi::glm_gp(
  counts,
  design = ~cell_line,
  col_data = col_data,
  reference_level = labels[[1L]],
  size_factors = size_factors,
  overdispersion = TRUE,
  on_disk = FALSE
)
# Wald SEs, as a user would build 90 % intervals: cov(beta) = (X^T W X)^-1 with
# W = mu / (1 + mu * overdispersion) per cell. For an intercept plus group indicators,
# X^T W X is the group-sum matrix of W; its inverse gives var(beta_g) = 1/S_0 + 1/S_g
# (S_g = sum of W over group g's cells) exactly, so one [features, cells] x [cells, groups]
# product serves every gene.
w <- fit$Mu / (1 + fit$Mu * fit$overdispersions) # overdispersions recycle down the genes
group_w <- w %*% indicator # [features, groups]
se <- sqrt(1 / group_w[, 1L] + 1 / group_w[, -1L, drop = FALSE])
fit_seconds <- proc.time()[["elapsed"]] - start

write_raw(fit$Beta, "beta.f64")
write_raw(se, "se.f64")
write_raw(fit$overdispersions, "overdispersion.f64")
status <- readLines("/proc/self/status", warn = FALSE)
hwm <- grep("^VmHWM:", status, value = TRUE)
vm_hwm_kb <- if (length(hwm)) as.numeric(strsplit(trimws(sub("^VmHWM:", "", hwm)), " +")[[1L]][1L]) else NA
meta <- c(
  fit_seconds = format(fit_seconds, digits = 15),
  coefficients = paste(colnames(fit$Beta), collapse = ","),
  r_version = paste(R.version$major, R.version$minor, sep = "."),
  glmgampoi_version = as.character(utils::packageVersion("glmGamPoi")),
  vm_hwm_kb = format(vm_hwm_kb, digits = 15)
)
writeLines(paste(names(meta), meta, sep = "\t"), path("meta.tsv"))
