# frozen_string_literal: true

# The Ruby half of `make demo`: job classes the Ruby dispatcher runs
# (`queue_worker_dispatcher -r demo_jobs.rb`). The Python half is demo_jobs.py.
require 'queue_dispatcher'

class ReportJob
  include QueueDispatcher::Job

  def self.render(title)
    5.times do |i|
      sleep 0.5
      update_message(msg: "rendering page #{i + 1}/5", perc_finished: (i + 1) * 20)
    end
    "#{title}.pdf"
  end

  def self.archive(name) = "archived #{name}"
end

class MailJob
  include QueueDispatcher::Job

  def self.send_mail(to)
    sleep 0.8
    update_message(msg: "sent to #{to}", perc_finished: 100)
    "mail to #{to}"
  end
end
